from kshipra.cli import main

main()
