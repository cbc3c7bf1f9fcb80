import sys

from .cli import demo

sys.exit(demo())
