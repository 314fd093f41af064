from sgdiff.cli.main import main

main()
