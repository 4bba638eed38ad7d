# First logon of the Windows build VM (run once by Autounattend's FirstLogonCommands, from the answer ISO).
# Leaves the VM reachable for Packer over SSH: virtio guest tools (drivers + QEMU guest agent),
# OpenSSH Server with port 22 open. Sysprep /generalize happens at the end of the Packer build.
# A transcript goes to C:\Windows\Temp\packer-firstlogon.log for post-mortems.
$ErrorActionPreference = 'Stop'
Start-Transcript -Path 'C:\Windows\Temp\packer-firstlogon.log' -Append | Out-Null

function Find-OnAnyDrive([string] $Relative) {
    foreach ($drive in Get-PSDrive -PSProvider FileSystem) {
        $candidate = Join-Path $drive.Root $Relative
        if (Test-Path -LiteralPath $candidate) { return $candidate }
    }
    return $null
}

# virtio-win: the guest tools installer carries every driver and the QEMU guest agent.
$tools = Find-OnAnyDrive 'virtio-win-guest-tools.exe'
if ($tools) {
    Start-Process -FilePath $tools -ArgumentList '/install', '/quiet', '/norestart' -Wait
} else {
    # Older virtio-win ISOs: the agent alone, as an MSI.
    $agent = Find-OnAnyDrive 'guest-agent\qemu-ga-x86_64.msi'
    if (-not $agent) { throw 'virtio-win ISO not found on any drive: no guest tools, no guest agent' }
    Start-Process -FilePath 'msiexec.exe' -ArgumentList '/i', "`"$agent`"", '/qn', '/norestart' -Wait
}
Set-Service -Name 'QEMU-GA' -StartupType Automatic -ErrorAction SilentlyContinue
Start-Service -Name 'QEMU-GA' -ErrorAction SilentlyContinue

# OpenSSH Server: a Windows capability. Server 2022 lacks it (fetched from Windows Update here); Server 2025
# has it installed but its sshd service disabled, so the add is skipped and the service is set below.
$capability = Get-WindowsCapability -Online -Name 'OpenSSH.Server*' | Select-Object -First 1
if ($capability.State -ne 'Installed') {
    Add-WindowsCapability -Online -Name $capability.Name | Out-Null
}
Set-Service -Name 'sshd' -StartupType Automatic
Start-Service -Name 'sshd'
# Packer's Windows provisioners expect PowerShell as the SSH shell.
New-ItemProperty -Path 'HKLM:\SOFTWARE\OpenSSH' -Name 'DefaultShell' -PropertyType String -Force `
    -Value 'C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe' | Out-Null

# Authorized keys for administrators (from the catalog's ssh_authorized_keys_env), if any were rendered.
$keys = Join-Path $PSScriptRoot 'administrators_authorized_keys'
if ((Test-Path -LiteralPath $keys) -and (Get-Item -LiteralPath $keys).Length -gt 0) {
    $target = Join-Path $env:ProgramData 'ssh\administrators_authorized_keys'
    Copy-Item -LiteralPath $keys -Destination $target -Force
    # sshd ignores the file unless only Administrators and SYSTEM can write it.
    icacls.exe $target /inheritance:r /grant 'Administrators:F' /grant 'SYSTEM:F' | Out-Null
}

# Port 22 on every profile: the build network is usually "Public" until someone says otherwise (Server 2025's
# preinstalled rule allows only the Domain and Private profiles).
$rule = Get-NetFirewallRule -Name 'OpenSSH-Server-In-TCP' -ErrorAction SilentlyContinue
if ($rule) {
    Set-NetFirewallRule -Name 'OpenSSH-Server-In-TCP' -Enabled True -Profile Any
} else {
    New-NetFirewallRule -Name 'OpenSSH-Server-In-TCP' -DisplayName 'OpenSSH Server (sshd)' -Enabled True `
        -Direction Inbound -Protocol TCP -Action Allow -LocalPort 22 -Profile Any | Out-Null
}
Stop-Transcript | Out-Null
