"""`python -m weathermixer` is the `weathermixer` command."""
from weathermixer.cli.main import main

if __name__ == "__main__":
    main()
