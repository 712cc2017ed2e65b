"""The tools package is light: importing it and parsing needs neither torch nor xgrammar nor jsonschema."""
from __future__ import annotations

import subprocess
import sys


def test_tools_import_without_torch_xgrammar_jsonschema():
    code = ("import sys\n"
            "for m in ('torch', 'xgrammar', 'jsonschema'): sys.modules[m] = None\n"
            "import tokenmill.tools as t\n"
            "p = t.get_tool_parser(t.detect_parser(None)).parse('<tool_call>{\"name\": \"a\", \"arguments\": {}}')\n"
            "assert p.tool_calls[0].name == 'a', p\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
