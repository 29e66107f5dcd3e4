"""`flip-ds bench`: step time, masking speedup, largest batch under a memory budget, ZeRO stages,
MFU against a matmul peak measured in the same run, and OpenCLIP's trainer side by side.

Every timed configuration is a case; cases run interleaved (A B C A B C ...) and are summarised by
medians, so a noisy machine slows all of them alike instead of biasing one.
"""
