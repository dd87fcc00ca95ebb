import sys

from shardchat.cli import main

sys.exit(main())
