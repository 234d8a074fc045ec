from flowcraft_cli.cli.app import main

main()
