"""The headless runner of this pack, in parts the server tests reuse.

convert      front-end workflow -> API prompt (/object_info), --set / --image checks
client       HTTP + WebSocket client of a running ComfyUI (aiohttp)
server       the host process: main.py on 127.0.0.1 with a temp --base-directory, this pack linked in
run          one prompt: submit, follow progress, read the result and its files
tiny_models  tiny random-weight models in the real layouts (selfcheck, server tests)
cli          the command line (tools/run_workflow.py)
"""
