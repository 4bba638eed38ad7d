"""The one root of every error this project raises on purpose.

    PackerAssetsError
    ├── ConfigError (also a ValueError): bad input, found before anything is changed
    │   CatalogError, SettingsError, EnvFileError, PasswordError, RenderError, RenderRecordError, AnswerIsoError,
    │   ChannelError, WorkdirError > PackerCapabilityError, PackerEnvError, PackerAuthError
    └── OperationError (also a RuntimeError): the work itself failed
        PveAccessError, BootstrapError > SshBootstrapError, StagingError, TemplateError > VmidRangeFull,
        SmokeTestError, SmokeInternalError (a bug of ours, not the template's),
        PackerError > PackerCancelled | PackerTimeout, PackerVersionError, ChecksumError, ValidatorUnavailable,
        KeyBusy, BuildPrivilegeError, NoPromotedBuild, LabError

Every message names what and where (file, key, field, URL, VMID) and never holds a secret, so the CLI
prints any of them as one line; anything else that escapes is a bug and keeps its traceback.
"""


class PackerAssetsError(Exception):
    """Root of the project's errors."""


class ConfigError(PackerAssetsError, ValueError):
    """Bad input: a catalog, a setting, an env file, a template value."""


class OperationError(PackerAssetsError, RuntimeError):
    """Doing the work failed: the API, packer, the node, a download."""
