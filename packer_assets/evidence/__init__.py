"""Evidence: the output layout and atomic writes, chain IDs, proofs, signing and verifying them, the audit, the registry and channels."""
