import sys
from pathlib import Path

# engine_driver.py (test helpers) sits beside the tests; make it importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))
