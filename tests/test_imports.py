"""The library never imports its test-time oracles (PEFT, bitsandbytes)."""

import re
import subprocess
import sys
from pathlib import Path

import lorakit

# lorakit.integrations extends transformers' Trainer and TRL, which import PEFT themselves when it is
# installed; that subpackage is checked by reading its source instead.
CODE = """
import importlib, pathlib, sys
import lorakit
root = pathlib.Path(lorakit.__file__).parent
for path in sorted(root.rglob("*.py")):
    name = ".".join(("lorakit",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    if not name.startswith("lorakit.integrations"):
        importlib.import_module(name)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "bitsandbytes")))
"""


def test_no_oracle_is_imported():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_no_source_file_imports_an_oracle():
    pattern = re.compile(r"^\s*(from|import)\s+(peft|bitsandbytes)\b", re.M)
    offenders = [str(p) for p in Path(lorakit.__file__).parent.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
