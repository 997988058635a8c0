"""Where the repository's files are, for tests that read docs, examples or fixtures."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(REPO, "docs")
EXAMPLES = os.path.join(REPO, "example_configs")
DATA = os.path.join(REPO, "tests", "data")
