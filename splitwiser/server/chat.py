"""Chat messages to a prompt: the tokenizer's chat template, ``--chat-template FILE``, or for
the embedded model (whose tokenizer has none) a simple one of Splitwiser's own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitwiser.errors import ConfigError
from splitwiser.server.errors import BadRequest

# the embedded default model's template: one line per role marker, then the content
EMBEDDED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

NO_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
    "a chat template if the tokenizer does not define one (splitwiser serve --chat-template FILE)."
)


def read_chat_template(path: str | None) -> str | None:
    """The template in ``path`` (a Jinja file), or ``None`` for none given."""
    if path is None:
        return None
    try:
        return Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read --chat-template {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ChatTemplate:
    """Where the served model's template comes from; ``text`` None: the tokenizer's own."""

    source: str  # "file", "tokenizer", "embedded" or "none" (chat requests get a 400)
    text: str | None = None

    @classmethod
    def choose(cls, tokenizer, given: str | None, embedded: bool) -> ChatTemplate:
        """``given`` first, then the tokenizer's own, then (embedded model only) ours."""
        if given is not None:
            return cls("file", given)
        if getattr(tokenizer, "chat_template", None):
            return cls("tokenizer")
        return cls("embedded", EMBEDDED_CHAT_TEMPLATE) if embedded else cls("none")


def render_chat(
    tokenizer,
    template: ChatTemplate,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    kwargs: dict | None = None,
) -> str:
    """The prompt text of ``messages``; a 400 for a model with no template or a template error."""
    if template.source == "none":
        raise BadRequest(NO_TEMPLATE)
    if continue_final_message and add_generation_prompt:
        raise BadRequest(
            "continue_final_message and add_generation_prompt cannot both be true; "
            "set add_generation_prompt to false"
        )
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template.text,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(kwargs or {}),
        )
    except Exception as exc:  # jinja2's errors, a template that rejects the messages
        raise BadRequest(f"the chat template failed: {exc}") from None
