"""Disaggregated prefill / decode: the proxy that pairs a prefill and a decode instance (proxy.py) and the
server's side of the kv_transfer_params handshake (params.py). The scheduler's side is
tokenmill/core/kv_transfer.py, the transfer itself tokenmill/worker/kv_connector.py. See docs/DISAGG.md."""
