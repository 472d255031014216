"""Derived objects (SEG, Secondary Capture, SR) for the PACS; see build_outputs."""
