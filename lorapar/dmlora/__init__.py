"""Dual-Module Collaborative LoRA (Cao, Zhang, Zhang, Li; ACML 2025), the second method, by concept:

  args.py       DualArgs: the --dual-* settings (shape, inits, screening schedule)
  layer.py      DualLoRALinear: the PiSSA shared module + the gated expert module of one projection
  modules.py    the model level: apply_dual, adapter keys, the masks of every module
  files.py      the adapter on disk (save_dual_adapter, load_dual_adapter)
  budget.py     the budget schedule: live expert components after each optimizer step
  screening.py  AdaLoRA's sensitivity EMAs and the screening that keeps the best components
  training.py   what a training loop calls: DualTraining and the orthogonality regulariser

Nothing is imported here, so that a LoRA-PAR run, or a parser that needs only DualArgs, never loads
the rest (import from the files above).
"""
