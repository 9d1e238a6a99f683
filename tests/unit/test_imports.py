"""The library never imports its test-time oracles (PEFT, bitsandbytes)."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import lorakit
for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
    importlib.import_module(info.name)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "bitsandbytes")))
"""


def test_no_oracle_is_imported():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
