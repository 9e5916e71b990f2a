from wsi_assist.cli import main

main()
