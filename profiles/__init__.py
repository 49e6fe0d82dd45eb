"""The device profiles that ship with fedbe, one YAML file each.

Installed as the package ``fedbe_profiles`` (pyproject.toml maps this folder to it), so that
``fedbe-edge profile --profile jetson-orin-nano-8gb`` finds them from any working directory.
Load them with :func:`fedbe.device_profile.load_profile`; there is no code here.
"""
