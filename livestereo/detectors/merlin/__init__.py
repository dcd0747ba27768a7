"""Quantum Detectors Merlin: .mib/MPX decoding (mib), TCP source (source), simulator (sim)."""
