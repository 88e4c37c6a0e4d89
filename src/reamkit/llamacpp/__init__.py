"""The pinned llama.cpp, in one place: nothing here imports a stage of reamkit.

- :mod:`.toolchain`: the version pins, where the tools and the converter are, the commit they report;
- :mod:`.process`: the one way a llama.cpp process starts (dies with reamkit, exit grace, reruns, timeouts,
  streamed log, one error style); :mod:`.tools` runs a tool by name through it;
- :mod:`.repack`: whether llama.cpp's weight repacking works on this CPU, and turning it off where not;
- :mod:`.gguf_file`: opening a GGUF, its metadata and tensor table, and its checks;
- :mod:`.doctor`: ``reamkit doctor``.
"""
