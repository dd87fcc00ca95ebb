"""Placement of chats and users on worker slots.

Rendezvous (highest random weight) hashing: every slot gets a score from a
stable hash of ``(key, slot)`` and the key goes to the highest score. The
router and the matchmaker call the same function, so both agree on which
worker owns a chat, and growing from N to N+1 slots moves only about 1/(N+1)
of the keys. BLAKE2b is used because Python's ``hash()`` of a string changes
between processes.
"""

import hashlib


def _score(key: bytes, slot: int) -> int:
    digest = hashlib.blake2b(key + slot.to_bytes(4, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place(key: str, slots: int) -> int:
    """Return the slot in ``range(slots)`` that owns ``key``."""
    if slots < 1:
        raise ValueError(f"invalid slot count {slots}: must be at least 1")
    if slots == 1:
        return 0
    encoded = key.encode()
    return max(range(slots), key=lambda slot: _score(encoded, slot))
