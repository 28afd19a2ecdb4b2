"""An in-process relay: the relay's event loop in a thread of this process (tests, embedding).

    relay = LocalRelay(store, upstream, ping_interval=1.0).start()
    client = relay.client()          # the same RelayClient an HTTP worker uses
    ...
    relay.stop()                     # running sessions end ``aborted``

It serves the real hand-off protocol on a private unix socket, so an app built on it runs
the same code paths as under gunicorn, without relay processes.
"""
