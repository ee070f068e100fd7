from raylead.cli import main

main()
