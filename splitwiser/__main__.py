from splitwiser.cli import main

main()
