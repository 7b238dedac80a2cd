"""10,000 streams opened and closed one after another in one session."""

from __future__ import annotations

import pytest

import netchan

from .helpers import echo


@pytest.mark.async_timeout(240)
@pytest.mark.timeout(300)
async def test_ten_thousand_sequential_streams(ids, engine):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["udp://127.0.0.1:0"], allow=[client_id.node_id],
                            engine=engine) as server:
        server.serve("echo", echo)
        async with netchan.Node(client_id, engine=engine) as client:
            peer = await client.connect(server.addresses[0], node_id=server.node_id)
            for i in range(10_000):
                msg = i.to_bytes(4, "big")
                async with await peer.open_stream("echo") as stream:
                    await stream.send(msg)
                    await stream.send_eof()
                    assert await stream.receive() == msg
                    with pytest.raises(netchan.EndOfStream):
                        await stream.receive()
            assert not peer.closed and peer.reconnects == 0  # the same session throughout
            # nothing accumulates per finished stream
            session = peer._session
            assert len(session.streams) == 0
            assert len(session.core._open) <= 2
