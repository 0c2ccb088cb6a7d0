"""protocol/ must import without trio or any I/O library present."""

import subprocess
import sys
import textwrap


def test_protocol_imports_without_trio() -> None:
    # A fresh interpreter where importing trio (or trio_websocket) fails.
    script = textwrap.dedent(
        """
        import sys, importlib, pkgutil
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"trio", "trio_websocket", "h11", "sqlite3"}:
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        import protocol
        for mod in pkgutil.walk_packages(protocol.__path__, "protocol."):
            importlib.import_module(mod.name)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
