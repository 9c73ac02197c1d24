// English and Chinese. The choice (not the key) is remembered in localStorage; the API is asked
// for its messages in the same language through Accept-Language.
const STRINGS = {  // key: [English, Chinese]
  title: ['CST admin', 'CST 管理'],
  language: ['Language', '语言'],
  signout: ['Sign out', '退出'],
  'live.on': ['Live', '实时'],
  'live.off': ['Reconnecting…', '重新连接中…'],
  'tab.instances': ['Instances', '实例'],
  'tab.logs': ['Logs', '日志'],
  'tab.pool': ['Key pool', '密钥池'],
  'tab.file': ['Desired file', '期望状态文件'],
  'signin.title': ['Sign in', '登录'],
  'signin.key': ['Admin key', '管理员密钥'],
  'signin.submit': ['Sign in', '登录'],
  'signin.hint': [
    'The key is kept for this browser tab only: closing the tab forgets it.',
    '密钥只保存在当前浏览器标签页中，关闭标签页即清除。',
  ],
  'signin.wait': ['Try again in {s} s.', '请在 {s} 秒后重试。'],
  'signin.out': ['Signed out: {reason}', '已退出：{reason}'],
  'err.network': ['The API does not answer: {reason}', 'API 无响应：{reason}'],
  'err.wait': ['{message} Wait {s} s.', '{message} 请等待 {s} 秒。'],
  'create.port': ['Port', '端口'],
  'create.submit': ['Create instance', '创建实例'],
  'create.busy': ['Creating {id}: it answers in a few seconds…', '正在创建 {id}，几秒后即可访问…'],
  'col.id': ['ID', 'ID'],
  'col.port': ['Port', '端口'],
  'col.desired': ['Desired', '期望状态'],
  'col.status': ['Status', '状态'],
  'col.uptime': ['Uptime', '运行时长'],
  'col.restarts': ['Restarts', '重启次数'],
  'col.failure': ['Last failure', '最近故障'],
  'col.dataDir': ['Data dir', '数据目录'],
  'col.actions': ['Actions', '操作'],
  'status.online': ['running', '运行中'],
  'status.stopped': ['stopped', '已停止'],
  'status.errored': ['errored', '出错'],
  'status.crashed': ['crashed', '已崩溃'],
  'status.starting': ['starting…', '启动中…'],
  'status.stopping': ['stopping…', '停止中…'],
  'status.restarting': ['restarting…', '重启中…'],
  'status.deleting': ['deleting…', '删除中…'],
  'status.resetting': ['restarting…', '重启中…'],
  'desired.running': ['running', '运行'],
  'desired.stopped': ['stopped', '停止'],
  'desired.absent': ['removed', '已移除'],
  'act.start': ['Start', '启动'],
  'act.stop': ['Stop', '停止'],
  'act.restart': ['Restart', '重启'],
  'act.logs': ['Logs', '日志'],
  'act.more': ['More', '更多'],
  'act.password': ['Reset password', '重置密码'],
  'act.backup': ['Download backup', '下载备份'],
  'act.file': ['Show in file', '在文件中查看'],
  'act.delete': ['Delete', '删除'],
  'empty.instances': [
    'No instances yet: create one above, or add one to desired.yaml.',
    '还没有实例：可在上方创建，或在 desired.yaml 中添加。',
  ],
  activity: ['Activity', '动态'],
  'activity.empty': ['Nothing has happened since this page opened.', '打开本页以来没有新动态。'],
  'change.started': ['started', '已启动'],
  'change.stopped': ['stopped', '已停止'],
  'change.crashed': ['crashed', '崩溃'],
  'change.restarted': ['restarted', '已重启'],
  'change.failed': ['failed', '失败'],
  'change.removed': ['removed', '已删除'],
  'change.adopted': ['adopted', '已接管'],
  'change.file': ['desired.yaml changed', 'desired.yaml 已修改'],
  'change.invalid': ['desired.yaml is invalid', 'desired.yaml 无效'],
  cancel: ['Cancel', '取消'],
  ok: ['OK', '确定'],
  close: ['Close', '关闭'],
  copy: ['Copy', '复制'],
  copied: ['Copied', '已复制'],
  'delete.title': ['Delete {id}?', '删除 {id}？'],
  'delete.ok': ['Delete and archive', '删除并归档'],
  'delete.text': [
    'It stops and leaves desired.yaml. Its data in {dataDir} is not deleted: it moves to the archive, {archive}/{id}-<UTC time>.',
    '实例将停止并从 desired.yaml 中移除。其数据 {dataDir} 不会被删除，而是移入归档：{archive}/{id}-<UTC 时间>。',
  ],
  'password.title': ['Reset the password of {id}?', '重置 {id} 的密码？'],
  'password.ok': ['Reset', '重置'],
  'password.text': ['The instance restarts with a new password, and the old one stops working.', '实例将使用新密码重启，旧密码随即失效。'],
  'secret.password': ['New password of {id}', '{id} 的新密码'],
  'secret.created': ['{id} is running', '{id} 已运行'],
  'secret.text': ['User name: {id}. The password is shown only this once: copy it now.', '用户名：{id}。密码只显示这一次，请立即复制。'],
  'backup.done': ['Backup of {id} downloaded', '已下载 {id} 的备份'],
  'logs.instance': ['Instance', '实例'],
  'logs.lines': ['Lines', '行数'],
  'logs.follow': ['Follow', '实时跟踪'],
  'logs.reload': ['Reload', '重新加载'],
  'logs.live': ['following', '跟踪中'],
  'logs.ended': ['ended', '已结束'],
  'logs.loading': ['loading…', '加载中…'],
  'logs.empty': ['No instance to show.', '没有可显示的实例。'],
  'pool.balance': ['Total balance', '总余额'],
  'pool.keys': ['Keys available', '可用密钥'],
  'pool.url': ['Proxy URL', '代理地址'],
  'pool.accounts': ['Accounts', '账户'],
  'pool.keyList': ['Keys', '密钥'],
  'pool.off': ['The key-pool proxy is not running.', '密钥池代理未运行。'],
  'pool.noAccounts': ['No accounts in desired.yaml.', 'desired.yaml 中没有账户。'],
  'pool.noKeys': ['No keys.', '没有密钥。'],
  'acc.name': ['Account', '账户'],
  'acc.provider': ['Provider', '来源'],
  'acc.state': ['State', '状态'],
  'acc.balance': ['Balance', '余额'],
  'acc.keys': ['Keys', '密钥数'],
  'acc.refreshed': ['Last refresh', '最近刷新'],
  'acc.cached': ['serving cached keys', '正在使用缓存的密钥'],
  'state.ok.daidai': ['logged in', '已登录'],
  'state.ok.static': ['loaded', '已加载'],
  'state.error': ['error', '错误'],
  'state.pending': ['waiting', '等待中'],
  'key.key': ['Key', '密钥'],
  'key.account': ['Account', '账户'],
  'key.balance': ['Balance', '余额'],
  'key.used': ['Used', '已用'],
  'key.requests': ['Requests', '请求数'],
  'key.failures': ['Failures', '失败数'],
  'key.cooldown': ['Cooldown until', '冷却至'],
  'key.available': ['Available', '可用'],
  yes: ['yes', '是'],
  no: ['no', '否'],
  'file.path': ['File', '文件'],
  'file.valid': ['valid', '有效'],
  'file.invalid': ['invalid: the last valid version stays in force', '无效：仍执行上一个有效版本'],
  'file.problems': ['Problems', '问题'],
  'file.line': ['line {n}', '第 {n} 行'],
  'file.lastRun': ['Last reconcile', '最近一次调和'],
  'file.never': ['not yet', '尚未'],
  'file.changes': ['What it changed', '变更内容'],
  'file.nothing': ['nothing needed changing', '无需变更'],
  'file.recap': ['ok {ok} · changed {changed} · failed {failed}', '正常 {ok} · 变更 {changed} · 失败 {failed}'],
  'file.took': ['{ms} ms', '{ms} 毫秒'],
  'file.readonly': [
    'Read-only here: edit the file itself, or use PUT /api/desired.',
    '此处只读：请直接编辑文件，或使用 PUT /api/desired。',
  ],
};

const LANGUAGES = ['en', 'zh'];
const STORE = 'cst-lang';
let current = localStorage.getItem(STORE)
  || ((navigator.language || '').toLowerCase().startsWith('zh') ? 'zh' : 'en');
if (!LANGUAGES.includes(current)) current = 'en';

export function lang() { return current; }

export function setLang(value) {
  current = LANGUAGES.includes(value) ? value : 'en';
  localStorage.setItem(STORE, current);
}

export function t(key, params = {}) {
  const text = STRINGS[key]?.[current === 'zh' ? 1 : 0] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in params ? String(params[name]) : whole));
}

// Fill every element marked data-i18n (its text) or data-i18n-label (its aria-label)
export function translate(root = document) {
  document.documentElement.lang = current === 'zh' ? 'zh-CN' : 'en';
  document.title = t('title');
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-label]')) el.setAttribute('aria-label', t(el.dataset.i18nLabel));
}
