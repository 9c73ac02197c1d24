"""API messages in English and Chinese; the Chinese wording is the seed's where it has one.

The language comes from ``?lang=zh|en``, else the request's Accept-Language, else Chinese,
which is what the seed answers a bare ``curl``.
"""
from __future__ import annotations

from typing import Mapping

MESSAGES: dict[str, tuple[str, str]] = {
    # key: (English, Chinese)
    "missing_admin_key": ("Missing admin key (header X-ST-Admin-Key)", "缺少管理员密钥"),
    "invalid_admin_key": ("Invalid admin key", "管理员密钥无效"),
    "too_many_failures": ("Too many wrong admin keys from your address; try again in {seconds} s",
                          "来自您地址的错误管理员密钥过多，请在 {seconds} 秒后重试"),
    "missing_port": ("Missing port", "缺少端口号"),
    "invalid_port": ("Invalid port {port}: it must be an integer from 1024 to 65535",
                     "端口号无效 {port}：必须是 1024 到 65535 之间的整数"),
    "port_declared": ("Port {port} is already used by {id}", "端口 {port} 已被占用（{id}）"),
    "port_in_use": ("Port {port} is already in use by another process", "端口 {port} 已被其他进程占用"),
    "reserved_port": ("Port {port} is already taken by {setting}", "端口 {port} 已被 {setting} 占用"),
    "not_found": ("Instance {id} not found", "实例不存在：{id}"),
    "bad_day": ("{field} must be a date as YYYY-MM-DD, not {value}", "{field} 必须是 YYYY-MM-DD 格式的日期，而不是 {value}"),
    "bad_range": ("from ({first}) must not be after to ({last}), and the range may span at most {days} days",
                  "from（{first}）不能晚于 to（{last}），且范围最多 {days} 天"),
    "bad_caller": ("instance must be an instance id (st-instance-<port>), client or anonymous, not {value}",
                   "instance 必须是实例 ID（st-instance-<端口>）、client 或 anonymous，而不是 {value}"),
    "no_proxy": ("The key-pool proxy is not running in this cst serve", "此 cst serve 中的密钥池代理未运行"),
    "bad_body": ("The request body must be a JSON object", "请求体必须是 JSON 对象"),
    "bad_content_type": ("The request body must be JSON (Content-Type: application/json), not {content_type}",
                         "请求体必须是 JSON（Content-Type: application/json），而不是 {content_type}"),
    "create_failed": ("Failed to create instance: {reason}", "创建实例失败：{reason}"),
    "start_failed": ("Failed to start instance: {reason}", "启动实例失败：{reason}"),
    "stop_failed": ("Failed to stop instance: {reason}", "停止实例失败：{reason}"),
    "restart_failed": ("Failed to restart instance: {reason}", "重启实例失败：{reason}"),
    "park_unavailable": ("{id} cannot be parked or woken: it has no park_after, or it is not running in desired.yaml",
                         "{id} 无法休眠或唤醒：它没有设置 park_after，或在 desired.yaml 中不是运行状态"),
    "park_failed": ("Failed to park {id}: {reason}", "休眠 {id} 失败：{reason}"),
    "park_busy": ("{id} was not parked: another cst has held the state dir for {seconds}s ({holder})",
                  "{id} 未休眠：另一个 cst 已占用状态目录 {seconds} 秒（{holder}）"),
    "wake_failed": ("Failed to wake {id}: {reason}", "唤醒 {id} 失败：{reason}"),
    "state_busy": ("{id}'s key was not rotated: another cst has held the state dir for {seconds}s ({holder}); "
                   "try again", "{id} 的密钥未轮换：另一个 cst 已占用状态目录 {seconds} 秒（{holder}），请稍后再试"),
    "delete_failed": ("Failed to delete instance: {reason}", "删除实例失败：{reason}"),
    "list_failed": ("Failed to list instances", "获取实例列表失败"),
    "deleted": ("Instance deleted; its data was archived in {archive}", "实例已删除，数据已归档至 {archive}"),
    "deleted_no_data": ("Instance deleted; it had no data to archive", "实例已删除（无数据需要归档）"),
    "stopped": ("Instance stopped", "实例已停止"),
    "started": ("Instance started", "实例已启动"),
    "restarted": ("Instance restarted", "实例已重启"),
    "parked": ("Instance parked: its port stays open and its first request wakes it",
               "实例已休眠：端口保持开放，第一个请求会唤醒它"),
    "woken": ("Instance woken", "实例已唤醒"),
    "no_data": ("Instance {id} has no data directory yet", "实例 {id} 还没有数据目录"),
    "file_invalid": ("desired.yaml is invalid, so nothing was changed: {problems}",
                     "desired.yaml 无效，未做任何修改：{problems}"),
    "change_invalid": ("The change would make desired.yaml invalid, so nothing was written: {problems}",
                       "该修改会使 desired.yaml 无效，未写入：{problems}"),
    "stale": ("desired.yaml changed since you read it; its sha256 is now {sha256}",
              "desired.yaml 在读取后已被修改，当前 sha256 为 {sha256}"),
    "restricted": ("{fields} cannot be changed through the API: change desired.yaml itself (through git)",
                   "{fields} 不能通过 API 修改：请直接修改 desired.yaml（通过 git）"),
    "if_match_required": ("Send the sha256 you read in the If-Match header", "请在 If-Match 请求头中提供读取时的 sha256"),
    "password_from_env": ("The password of {id} comes from the environment variable {env}; change it there",
                          "{id} 的密码来自环境变量 {env}，请在那里修改"),
    "bad_tail": ("tail must be a whole number from 0 to {max}, not {tail}", "tail 必须是 0 到 {max} 之间的整数，而不是 {tail}"),
    "bad_follow": ("follow must be 1 or 0, not {follow}", "follow 必须是 1 或 0，而不是 {follow}"),
    "no_free_port": ("No free port from {start} on", "从 {start} 起没有空闲端口"),
    "write_failed": ("Could not write desired.yaml ({reason}); nothing was changed",
                     "无法写入 desired.yaml（{reason}），未做任何修改"),
    "not_applied": ("The change is in desired.yaml but was not applied within {seconds}s: {pending}. "
                    "cst serve goes on applying it",
                    "修改已写入 desired.yaml，但未在 {seconds} 秒内完成：{pending}。cst serve 会继续应用"),
    "internal": ("Internal server error", "服务器内部错误"),
    "not_route": ("Not found", "未找到"),
    "method": ("Method not allowed", "不支持的请求方法"),
    "key_rotated": ("{id} has a new proxy key; the old one no longer works",
                    "{id} 的代理密钥已更换，旧密钥已失效"),
    "proxy_off": ("{id} has proxy: false, so it has no proxy key", "{id} 设置了 proxy: false，没有代理密钥"),
    "missing_snapshot": ("Name the snapshot to restore: {{\"snapshot\": \"<id>\"}} (cst backups ID lists them)",
                         "请指定要恢复的快照：{{\"snapshot\": \"<id>\"}}（cst backups ID 可列出快照）"),
    "no_snapshot": ("{id} has no snapshot {snapshot}; nothing was stopped", "{id} 没有快照 {snapshot}，未停止任何实例"),
    "restore_busy": ("{id} was not restored: another cst has held the state dir for {seconds}s ({holder}); "
                     "nothing was stopped, try again",
                     "{id} 未恢复：另一个 cst 已占用状态目录 {seconds} 秒（{holder}），未停止任何实例，请稍后再试"),
    "restore_failed": ("Failed to restore {id}: {reason}", "恢复 {id} 失败：{reason}"),
    "restored": ("{id} has its data of snapshot {snapshot} again; the data it replaced is kept in {replaced}",
                 "{id} 已恢复到快照 {snapshot}；被替换的数据保存在 {replaced}"),
    "restored_no_data": ("{id} has its data of snapshot {snapshot} again (it had no data dir to replace)",
                         "{id} 已恢复到快照 {snapshot}（此前没有数据目录）"),
}


def language(query: Mapping[str, str], accept_language: str | None) -> str:
    lang = query.get("lang", "").lower()
    if lang in ("zh", "en"):
        return lang
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return "zh"


def message(key: str, lang: str, /, **params: object) -> str:
    english, chinese = MESSAGES[key]
    return (chinese if lang == "zh" else english).format(**params)
