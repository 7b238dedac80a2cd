"""The channel layer: Go-style channels between nodes (exact capacity, close,
work handed to whichever receiver asks first, select) and broadcast topics.

- ``core``: the owner's sans-I/O protocol core;
- ``channel``: local and remote channel handles, views, select, and the hub
  that serves a node's channels (registered on the node as an extension);
- ``topics``: broadcast topics and subscriptions;
- ``codec``: how values become bytes (msgpack, raw, pickle, typed);
- ``frames``: the typed frames on a channel's stream.

Imports only ``errors``, ``identity``, ``carriers``, ``session`` and ``node``.
"""
