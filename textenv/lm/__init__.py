"""The language-model helpers, textenv's ground floor: what ``policies`` needs of textenv.

- ``models``: loading causal LMs, bodies and tokenizers by name or path (built-in
  names, GGUF files), dropout off, quiet loading, frozen-model caching;
- ``slot_decoding``: one KV-cache slot per parallel episode (``SlotDecoder``), and the
  observation layout's rules, ``positions_of`` and ``last_token_index``;
- ``cache``: the folder where the project builds its own models (``$TEXTENV_HOME``).

Nothing here knows about tasks, rewards or environments; the env (``textenv.vector``)
and the policies (``policies``) both decode through these.
"""
