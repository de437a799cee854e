from pipeline_lib.cli import main

main()
