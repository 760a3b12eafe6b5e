"""The evidence study: do LoTR's and MoR's claims hold at small scale on real data? (docs/RESULTS.md)"""
