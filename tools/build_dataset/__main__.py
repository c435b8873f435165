import sys

from tools.build_dataset import main

if __name__ == "__main__":
  sys.exit(main())
