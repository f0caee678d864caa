"""A TCP port forward, run on a bed host: what `ssh -L` gives a user, with the far end inside that host.

    python tests/tcp_forward.py LISTEN_IP:PORT TARGET_IP:PORT

The bed uses it for the two tunnels of docs/cluster.md "Running on a cluster": the laptop reaching the head's
loopback-only dashboard, and the head's own `127.0.0.1:5000` (the MLflow server docs/cluster.md puts on the head;
on the bed that server lives on the `services` host, so its crashes and restarts stay real).
"""

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def main(listen: str, target: str) -> None:
    target_host, target_port = target.rsplit(":", 1)

    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:  # the far end is down: the client sees a closed connection, as through ssh -L
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
