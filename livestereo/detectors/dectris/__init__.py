"""DECTRIS SIMPLON stream: CBOR/JSON decoding (cbor), zmq source (source), simulator (sim)."""
