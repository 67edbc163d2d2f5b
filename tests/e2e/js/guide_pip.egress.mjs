// The coding-agent guide's flows that install packages, with the unmodified JavaScript SDK:
// `pip install` then a script using it, and `pip install -r requirements.txt`, pytest, then
// main. They need egress, so tests/e2e/test_e2b_egress.py runs this file (not *.test.mjs)
// against its own server, whose policy lets sandboxes reach only this machine's index.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

const PACKAGE = process.env.CELLBOX_PIP_PACKAGE ?? 'pyjokes'

let sbx
before(async () => {
  sbx = await Sandbox.create({ timeoutMs: 600_000, allowInternetAccess: true })
})
after(async () => {
  await sbx?.kill()
})

test('pip install, then a script that uses what it installed', async () => {
  const install = await sbx.commands.run(`pip install ${PACKAGE}`, { timeoutMs: 300_000 })
  assert.equal(install.exitCode, 0, install.stderr)
  assert.match(install.stdout, new RegExp(`Successfully installed ${PACKAGE}`))
  await sbx.files.write('joke.py', `import ${PACKAGE}\nprint(len(${PACKAGE}.get_joke()) > 0)\n`)
  const run = await sbx.commands.run('python joke.py')
  assert.equal(run.stdout, 'True\n', run.stderr)
})

test('pip install -r requirements.txt, pytest, then main', async () => {
  await sbx.files.write([
    { path: 'proj/requirements.txt', data: `pytest\n${PACKAGE}\n` },
    { path: 'proj/app.py', data: `import ${PACKAGE}\n\ndef joke():\n    return ${PACKAGE}.get_joke()\n` },
    { path: 'proj/test_app.py', data: 'from app import joke\n\ndef test_joke():\n    assert joke()\n' },
    { path: 'proj/main.py', data: 'from app import joke\nprint("main:", bool(joke()))\n' },
  ])
  const opts = { cwd: '/home/user/proj', timeoutMs: 300_000 }
  const install = await sbx.commands.run('pip install -r requirements.txt', opts)
  assert.equal(install.exitCode, 0, install.stderr)
  const tests = await sbx.commands.run('python -m pytest -q', opts)
  assert.match(tests.stdout, /1 passed/)
  const failing = 'from app import joke\n\ndef test_fails():\n    assert not joke()\n'
  await sbx.files.write('proj/test_fails.py', failing)
  await assert.rejects(sbx.commands.run('python -m pytest -q', opts), (e) => e.exitCode === 1 && /1 failed/.test(e.stdout))
  await sbx.files.remove('proj/test_fails.py')
  const main = await sbx.commands.run('python main.py', opts)
  assert.equal(main.stdout, 'main: True\n')
})
