"""Test helpers: async tests run on a fresh event loop, each bounded in time."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import netchan

#: default bound for one async test (pytest-timeout is a second, harder bound)
ASYNC_TIMEOUT = 60.0


def pytest_configure(config):
    config.addinivalue_line("markers", "async_timeout(seconds): bound for an async test")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    marker = pyfuncitem.get_closest_marker("async_timeout")
    limit = marker.args[0] if marker else ASYNC_TIMEOUT
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def bounded():
        await asyncio.wait_for(func(**kwargs), limit)

    asyncio.run(bounded())
    return True


@pytest.fixture(params=netchan.ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def ids():
    """Two throwaway identities: (server, client)."""
    return netchan.Identity.generate(), netchan.Identity.generate()


_memory_counter = iter(range(1 << 30))


@pytest.fixture
def memory_url():
    return f"memory://test{next(_memory_counter)}"


@pytest.fixture
def keys(tmp_path):
    """A server key and a client key in tmp_path: (tmp_path, server, client)."""
    server, client = netchan.Identity.generate(), netchan.Identity.generate()
    server.save(tmp_path / "server.key")
    client.save(tmp_path / "client.key")
    return tmp_path, server, client
