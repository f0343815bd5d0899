"""Sparkplug B 3.0 output mode (``broker.output = "sparkplug"``); see docs/sparkplug.md.

``sparkplug_b.proto`` is the Eclipse Tahu schema, unchanged. ``sparkplug_b_pb2.py``
and ``sparkplug_b_pb2.pyi`` are generated from it and committed (generated code:
not linted, not type-checked)::

    python -m grpc_tools.protoc --proto_path=gateway/sparkplug \
        --python_out=gateway/sparkplug --pyi_out=gateway/sparkplug sparkplug_b.proto
"""
