// English and Chinese. The choice (not the key) is remembered in localStorage; the API is asked
// for its messages in the same language through Accept-Language.
const STRINGS = {
  en: {
    title: 'CST admin', language: 'Language', signout: 'Sign out',
    'live.on': 'Live', 'live.off': 'Reconnecting…',
    'tab.instances': 'Instances', 'tab.logs': 'Logs', 'tab.pool': 'Key pool', 'tab.file': 'Desired file',
    'signin.title': 'Sign in', 'signin.key': 'Admin key', 'signin.submit': 'Sign in',
    'signin.hint': 'The key is kept for this browser tab only: closing the tab forgets it.',
    'signin.wait': 'Try again in {s} s.', 'signin.out': 'Signed out: {reason}',
    'err.network': 'The API does not answer: {reason}', 'err.wait': '{message} Wait {s} s.',
    'create.port': 'Port', 'create.submit': 'Create instance',
    'create.busy': 'Creating {id}: it answers in a few seconds…',
    'col.id': 'ID', 'col.port': 'Port', 'col.desired': 'Desired', 'col.status': 'Status',
    'col.uptime': 'Uptime', 'col.restarts': 'Restarts', 'col.failure': 'Last failure',
    'col.dataDir': 'Data dir', 'col.actions': 'Actions',
    'status.online': 'running', 'status.stopped': 'stopped', 'status.errored': 'errored',
    'status.crashed': 'crashed', 'status.starting': 'starting…', 'status.stopping': 'stopping…',
    'status.restarting': 'restarting…', 'status.deleting': 'deleting…', 'status.resetting': 'restarting…',
    'desired.running': 'running', 'desired.stopped': 'stopped', 'desired.absent': 'removed',
    'act.start': 'Start', 'act.stop': 'Stop', 'act.restart': 'Restart', 'act.logs': 'Logs',
    'act.more': 'More', 'act.password': 'Reset password', 'act.backup': 'Download backup',
    'act.file': 'Show in file', 'act.delete': 'Delete',
    'empty.instances': 'No instances yet: create one above, or add one to desired.yaml.',
    activity: 'Activity', 'activity.empty': 'Nothing has happened since this page opened.',
    'change.started': 'started', 'change.stopped': 'stopped', 'change.crashed': 'crashed',
    'change.restarted': 'restarted', 'change.failed': 'failed', 'change.removed': 'removed',
    'change.adopted': 'adopted', 'change.file': 'desired.yaml changed', 'change.invalid': 'desired.yaml is invalid',
    cancel: 'Cancel', ok: 'OK', close: 'Close', copy: 'Copy', copied: 'Copied',
    'delete.title': 'Delete {id}?', 'delete.ok': 'Delete and archive',
    'delete.text': 'It stops and leaves desired.yaml. Its data in {dataDir} is not deleted: it moves to the archive, {archive}/{id}-<UTC time>.',
    'password.title': 'Reset the password of {id}?', 'password.ok': 'Reset',
    'password.text': 'The instance restarts with a new password, and the old one stops working.',
    'secret.password': 'New password of {id}', 'secret.created': '{id} is running',
    'secret.text': 'User name: {id}. The password is shown only this once: copy it now.',
    'backup.done': 'Backup of {id} downloaded',
    'logs.instance': 'Instance', 'logs.lines': 'Lines', 'logs.follow': 'Follow', 'logs.reload': 'Reload',
    'logs.live': 'following', 'logs.ended': 'ended', 'logs.loading': 'loading…',
    'logs.empty': 'No instance to show.',
    'pool.balance': 'Total balance', 'pool.keys': 'Keys available', 'pool.url': 'Proxy URL',
    'pool.accounts': 'Accounts', 'pool.keyList': 'Keys', 'pool.off': 'The key-pool proxy is not running.',
    'pool.noAccounts': 'No accounts in desired.yaml.', 'pool.noKeys': 'No keys.',
    'acc.name': 'Account', 'acc.provider': 'Provider', 'acc.state': 'State', 'acc.balance': 'Balance',
    'acc.keys': 'Keys', 'acc.refreshed': 'Last refresh', 'acc.cached': 'serving cached keys',
    'state.ok.daidai': 'logged in', 'state.ok.static': 'loaded', 'state.error': 'error', 'state.pending': 'waiting',
    'key.key': 'Key', 'key.account': 'Account', 'key.balance': 'Balance', 'key.used': 'Used',
    'key.requests': 'Requests', 'key.failures': 'Failures', 'key.cooldown': 'Cooldown until',
    'key.available': 'Available', yes: 'yes', no: 'no',
    'file.path': 'File', 'file.valid': 'valid', 'file.invalid': 'invalid: the last valid version stays in force',
    'file.problems': 'Problems', 'file.line': 'line {n}', 'file.lastRun': 'Last reconcile',
    'file.never': 'not yet', 'file.changes': 'What it changed', 'file.nothing': 'nothing needed changing',
    'file.recap': 'ok {ok} · changed {changed} · failed {failed}', 'file.took': '{ms} ms',
    'file.readonly': 'Read-only here: edit the file itself, or use PUT /api/desired.',
  },
  zh: {
    title: 'CST 管理', language: '语言', signout: '退出',
    'live.on': '实时', 'live.off': '重新连接中…',
    'tab.instances': '实例', 'tab.logs': '日志', 'tab.pool': '密钥池', 'tab.file': '期望状态文件',
    'signin.title': '登录', 'signin.key': '管理员密钥', 'signin.submit': '登录',
    'signin.hint': '密钥只保存在当前浏览器标签页中，关闭标签页即清除。',
    'signin.wait': '请在 {s} 秒后重试。', 'signin.out': '已退出：{reason}',
    'err.network': 'API 无响应：{reason}', 'err.wait': '{message} 请等待 {s} 秒。',
    'create.port': '端口', 'create.submit': '创建实例',
    'create.busy': '正在创建 {id}，几秒后即可访问…',
    'col.id': 'ID', 'col.port': '端口', 'col.desired': '期望状态', 'col.status': '状态',
    'col.uptime': '运行时长', 'col.restarts': '重启次数', 'col.failure': '最近故障',
    'col.dataDir': '数据目录', 'col.actions': '操作',
    'status.online': '运行中', 'status.stopped': '已停止', 'status.errored': '出错',
    'status.crashed': '已崩溃', 'status.starting': '启动中…', 'status.stopping': '停止中…',
    'status.restarting': '重启中…', 'status.deleting': '删除中…', 'status.resetting': '重启中…',
    'desired.running': '运行', 'desired.stopped': '停止', 'desired.absent': '已移除',
    'act.start': '启动', 'act.stop': '停止', 'act.restart': '重启', 'act.logs': '日志',
    'act.more': '更多', 'act.password': '重置密码', 'act.backup': '下载备份',
    'act.file': '在文件中查看', 'act.delete': '删除',
    'empty.instances': '还没有实例：可在上方创建，或在 desired.yaml 中添加。',
    activity: '动态', 'activity.empty': '打开本页以来没有新动态。',
    'change.started': '已启动', 'change.stopped': '已停止', 'change.crashed': '崩溃',
    'change.restarted': '已重启', 'change.failed': '失败', 'change.removed': '已删除',
    'change.adopted': '已接管', 'change.file': 'desired.yaml 已修改', 'change.invalid': 'desired.yaml 无效',
    cancel: '取消', ok: '确定', close: '关闭', copy: '复制', copied: '已复制',
    'delete.title': '删除 {id}？', 'delete.ok': '删除并归档',
    'delete.text': '实例将停止并从 desired.yaml 中移除。其数据 {dataDir} 不会被删除，而是移入归档：{archive}/{id}-<UTC 时间>。',
    'password.title': '重置 {id} 的密码？', 'password.ok': '重置',
    'password.text': '实例将使用新密码重启，旧密码随即失效。',
    'secret.password': '{id} 的新密码', 'secret.created': '{id} 已运行',
    'secret.text': '用户名：{id}。密码只显示这一次，请立即复制。',
    'backup.done': '已下载 {id} 的备份',
    'logs.instance': '实例', 'logs.lines': '行数', 'logs.follow': '实时跟踪', 'logs.reload': '重新加载',
    'logs.live': '跟踪中', 'logs.ended': '已结束', 'logs.loading': '加载中…',
    'logs.empty': '没有可显示的实例。',
    'pool.balance': '总余额', 'pool.keys': '可用密钥', 'pool.url': '代理地址',
    'pool.accounts': '账户', 'pool.keyList': '密钥', 'pool.off': '密钥池代理未运行。',
    'pool.noAccounts': 'desired.yaml 中没有账户。', 'pool.noKeys': '没有密钥。',
    'acc.name': '账户', 'acc.provider': '来源', 'acc.state': '状态', 'acc.balance': '余额',
    'acc.keys': '密钥数', 'acc.refreshed': '最近刷新', 'acc.cached': '正在使用缓存的密钥',
    'state.ok.daidai': '已登录', 'state.ok.static': '已加载', 'state.error': '错误', 'state.pending': '等待中',
    'key.key': '密钥', 'key.account': '账户', 'key.balance': '余额', 'key.used': '已用',
    'key.requests': '请求数', 'key.failures': '失败数', 'key.cooldown': '冷却至',
    'key.available': '可用', yes: '是', no: '否',
    'file.path': '文件', 'file.valid': '有效', 'file.invalid': '无效：仍执行上一个有效版本',
    'file.problems': '问题', 'file.line': '第 {n} 行', 'file.lastRun': '最近一次调和',
    'file.never': '尚未', 'file.changes': '变更内容', 'file.nothing': '无需变更',
    'file.recap': '正常 {ok} · 变更 {changed} · 失败 {failed}', 'file.took': '{ms} 毫秒',
    'file.readonly': '此处只读：请直接编辑文件，或使用 PUT /api/desired。',
  },
};

const STORE = 'cst-lang';
let current = localStorage.getItem(STORE)
  || ((navigator.language || '').toLowerCase().startsWith('zh') ? 'zh' : 'en');
if (!(current in STRINGS)) current = 'en';

export function lang() { return current; }

export function setLang(value) {
  current = value in STRINGS ? value : 'en';
  localStorage.setItem(STORE, current);
}

export function t(key, params = {}) {
  const text = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in params ? String(params[name]) : whole));
}

// Fill every element marked data-i18n (its text) or data-i18n-label (its aria-label)
export function translate(root = document) {
  document.documentElement.lang = current === 'zh' ? 'zh-CN' : 'en';
  document.title = t('title');
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-label]')) el.setAttribute('aria-label', t(el.dataset.i18nLabel));
}
