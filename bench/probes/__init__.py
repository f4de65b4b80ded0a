"""One-off investigations, each ``python -m bench.probes.NAME --help`` from the checkout's root; kept while their
finding is not yet in docs/. Most need a CUDA GPU (``ops --cpu`` runs the kernels' parity in Triton's interpreter).

- ``ops``: the Triton kernels' parity against their references and their bandwidth (``bash bench/h200.sh OUT ops``);
- ``launch_sweep``, ``gemv_chain``, ``overlap_probe``: launch settings, the GEMV chain, L2 prefetch;
- ``qgemv_speed``: the int4 GEMV against its previous version, cuBLAS bf16 and int8, at LLaMA-2-7B's products;
- ``profile_decode``, ``profile_prefill``, ``prefill_memory``: where decode and prefill time and memory go;
- ``needle_trace``: where a compressed cache loses the passkey (``docs/retrieval.md``).
"""
