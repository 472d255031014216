"""Stage 1, receiving: the Storage SCP that faces the network.

The upper layer (PS3.8 associations, PDUs, DIMSE commands: :mod:`.connection`, :mod:`.association`,
:mod:`.negotiation`, :mod:`.acse`, :mod:`.pdu`, :mod:`.dimse`, following the state table in :mod:`.fsm`; the
interface in :mod:`.upper_layer`) hands each C-STORE data set to the SCP (:mod:`.scp`), which streams it to the
spool, fsyncs it, records it in the state store and only then answers Success; :mod:`.instance` and
:mod:`.header` read and check the few attributes it needs without decoding pixels. No processing happens here.
May import: :mod:`dicomnode.state`, :mod:`dicomnode.telemetry`, ``config``, ``errors``; never imaging,
inference, outputs, work or ops.
"""
