"""What runs a guard: loading a checkpoint (`load`), its calibration file (`calibration`), the `Guard`
facade for finished conversations (`guard`) and live sessions (`stream`).

No imports here: `qguard.runtime.load` stays importable without pulling in the session layer.
"""
