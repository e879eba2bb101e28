from data_tools.generate.cli import main

if __name__ == "__main__":
    main()
