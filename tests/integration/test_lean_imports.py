"""A gateway on SQLite never loads asyncpg (about 2.5 MB in every process, and the streaming
bench's RSS limit of 100 MB is near): it is imported only where change notifications run,
on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import write_config
from tests.process import REPO


def test_a_sqlite_gateway_opens_serves_its_admin_app_and_closes_without_asyncpg(tmp_path: Path) -> None:
    path = write_config(tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url="http://127.0.0.1:9")
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from gateway.admin import build_admin_app
        from gateway.app import Gateway
        from gateway.config import load_config

        os.chdir({str(tmp_path)!r})
        path = {str(path)!r}

        async def main():
            gateway = await Gateway.open(load_config(path, env={{}}))
            build_admin_app(gateway.admin_context())
            await gateway.close()

        asyncio.run(main())
        print("asyncpg" in sys.modules)
        """
    )
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", done.stdout
