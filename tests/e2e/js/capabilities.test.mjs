// More of the JavaScript SDKs' surface against cellbox (one sandbox for the file).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox as CodeInterpreter } from '@e2b/code-interpreter'
import { Sandbox, CommandExitError, NotFoundError } from 'e2b'

let sbx
before(async () => {
  sbx = await CodeInterpreter.create({ timeoutMs: 120_000, envs: { FROM_CREATE: 'yes' } })
})
after(async () => {
  await sbx?.kill()
})

test('files: write many, list with depth, exists, getInfo, makeDir, rename, remove', async () => {
  await sbx.files.write([
    { path: 'd/one.txt', data: '1' },
    { path: 'd/sub/two.txt', data: new Blob(['22']) },
  ])
  const paths = (await sbx.files.list('d', { depth: 2 })).map((e) => e.path)
  assert.ok(paths.includes('/home/user/d/one.txt') && paths.includes('/home/user/d/sub/two.txt'), paths.join())
  assert.equal(await sbx.files.exists('d/one.txt'), true)
  assert.equal(await sbx.files.exists('d/none.txt'), false)
  assert.equal((await sbx.files.getInfo('d/sub/two.txt')).size, 2)
  assert.equal(await sbx.files.makeDir('made'), true)
  assert.equal(await sbx.files.makeDir('made'), false)
  const moved = await sbx.files.rename('d/one.txt', 'd/uno.txt')
  assert.equal(moved.path, '/home/user/d/uno.txt')
  await sbx.files.remove('d/uno.txt')
  assert.equal(await sbx.files.exists('d/uno.txt'), false)
  await assert.rejects(sbx.files.read('d/uno.txt'), (e) => e instanceof NotFoundError)
})

test('runCode: envs, errors, contexts, bash', async () => {
  assert.equal((await sbx.runCode("import os; os.environ['FROM_CREATE']")).text, 'yes')
  assert.equal((await sbx.runCode("import os; os.environ['PER_RUN']", { envs: { PER_RUN: 'r' } })).text, 'r')
  const stdout = []
  const failed = await sbx.runCode("print('before'); 1/0", { onStdout: (m) => stdout.push(m.line) })
  assert.equal(failed.error?.name, 'ZeroDivisionError')
  assert.deepEqual(stdout, ['before\n'])
  const ctx = await sbx.createCodeContext({ language: 'python' })
  await sbx.runCode('z = 3', { context: ctx })
  assert.equal((await sbx.runCode('z', { context: ctx })).text, '3')
  assert.ok((await sbx.listCodeContexts()).some((c) => c.id === ctx.id))
  await sbx.restartCodeContext(ctx)
  assert.equal((await sbx.runCode("'z' in globals()", { context: ctx })).text, 'False')
  await sbx.removeCodeContext(ctx)
  const bash = await sbx.runCode('echo from-bash', { language: 'bash' })
  assert.deepEqual(bash.logs.stdout, ['from-bash\n'])
})

test('commands: connect by pid, kill, timeout, cwd and envs', async () => {
  const handle = await sbx.commands.run('sleep 1; echo done', { background: true })
  const again = await sbx.commands.connect(handle.pid)
  const result = await again.wait()
  assert.equal(result.stdout, 'done\n')
  const sleeper = await sbx.commands.run('sleep 60', { background: true })
  await sbx.commands.kill(sleeper.pid)
  await assert.rejects(sleeper.wait(), (e) => e instanceof CommandExitError)
  await assert.rejects(sbx.commands.run('sleep 30', { timeoutMs: 1000 }))
  assert.equal((await sbx.commands.run('echo $A', { envs: { A: 'x' } })).stdout, 'x\n')
  await sbx.files.makeDir('wd')
  const wd = (await sbx.commands.run('pwd', { cwd: '/home/user/wd' })).stdout
  assert.ok(wd.endsWith('/wd\n'), wd)
})

test('lifecycle: getInfo, setTimeout, metrics, isRunning', async () => {
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.state, 'running')
  await sbx.setTimeout(90_000)
  const later = await sbx.getInfo()
  assert.ok(later.endAt.getTime() - Date.now() > 60_000)
  assert.ok((await sbx.getMetrics()).length >= 1)
  await sbx.commands.run('sleep 1.2') // longer than the server's sample interval, over two whole seconds
  const series = await sbx.getMetrics()
  assert.ok(series.length >= 2 && series.every((m) => m.memTotal > 0 && m.cpuCount >= 1), JSON.stringify(series))
  const secs = series.map((m) => Math.floor(m.timestamp.getTime() / 1000))
  assert.deepEqual(secs, [...secs].sort((a, b) => a - b))
  const [first, last] = [secs[0], secs.at(-1)]
  assert.ok(last > first)
  // the SDK rounds start and end to seconds: whole-second dates keep the bounds exact
  const early = await sbx.getMetrics({ end: new Date(first * 1000) })
  assert.ok(early.length >= 1 && early.every((m) => m.timestamp.getTime() < (first + 1) * 1000))
  const late = await sbx.getMetrics({ start: new Date(last * 1000) })
  assert.ok(late.length >= 1 && late.every((m) => m.timestamp.getTime() >= last * 1000))
  assert.equal(await sbx.isRunning(), true)
  const gone = await Sandbox.connect('sb_0000000000000000').catch((e) => e)
  assert.ok(gone instanceof Error)
})

test('list: metadata filter with any characters, state array, paging with the next token', async () => {
  const odd = 'a b&c=d/é%+?'
  const made = []
  try {
    for (let i = 0; i < 3; i++) made.push(await Sandbox.create({ metadata: { suite: 'js-list', v: odd } }))
    const paginator = Sandbox.list({ query: { metadata: { suite: 'js-list', v: odd }, state: ['running', 'paused'] }, limit: 2 })
    const seen = []
    let pages = 0
    while (paginator.hasNext) {
      for (const s of await paginator.nextItems()) {
        assert.equal(s.metadata.v, odd)
        seen.push(s.sandboxId)
      }
      pages++
    }
    assert.equal(pages, 2)
    assert.deepEqual(seen.sort(), made.map((s) => s.sandboxId).sort())
    const paused = await Sandbox.list({ query: { metadata: { suite: 'js-list' }, state: ['paused'] } }).nextItems()
    assert.deepEqual(paused, [])
  } finally {
    for (const s of made) await s.kill()
  }
})
