from orchestration.main import main

main()
