import sys

from consumer.app import main

if __name__ == "__main__":
    sys.exit(main())
