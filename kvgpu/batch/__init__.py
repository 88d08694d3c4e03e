"""The batch engine: the seed pipeline for many instances at once as padded arrays.

Modules: ``state`` (the padded struct-of-arrays and placement state), ``pack`` (candidate
packings as parallel lanes), ``local`` (batched improve_local / refine_peak), ``bounds``
(lower bounds), ``pipeline`` (the whole pipeline, shape buckets), ``arrays`` (helpers).
All of it is written against an array namespace ``xp`` (NumPy here, CuPy on a GPU), carried with
the compiled steps to use, if any, by an :class:`~kvgpu.batch.array_engine.ArrayEngine` passed
down from the entry points (``array_engine``).
"""
