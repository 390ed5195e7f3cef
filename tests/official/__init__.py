"""Pinned copies of the official I2E reference code (test data for the parity tests).

See NOTICE.md: source repository, commit and licence. The two modules are byte-for-byte the
files of ``Train Script/Baseline-II/Network/`` (identical in Baseline-I and Inference).
"""
