// Server streams and signed URLs with the JavaScript SDK: watchDir (a Connect server stream
// over fetch), downloadUrl/uploadUrl (no routing headers at all), gzip uploads.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

let sbx
before(async () => {
  sbx = await Sandbox.create({ timeoutMs: 120_000 })
})
after(async () => {
  await sbx?.kill()
})

test('watchDir streams events until stopped', async () => {
  await sbx.files.makeDir('watched')
  const names = []
  let resolve
  const seen = new Promise((r) => (resolve = r))
  const handle = await sbx.files.watchDir('watched', (event) => {
    names.push(event.name)
    if (event.name === 'new.txt') resolve()
  })
  try {
    await sbx.files.write('watched/new.txt', 'x')
    await Promise.race([
      seen,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`no event, got ${names}`)), 15_000)),
    ])
  } finally {
    await handle.stop()
  }
})

test('signed download and upload URLs', async () => {
  await sbx.files.write('shared.txt', 'signed content')
  const url = await sbx.downloadUrl('shared.txt')
  assert.match(url, /signature=/)
  const got = await fetch(url)
  assert.equal(got.status, 200)
  assert.equal(await got.text(), 'signed content')
  const bad = await fetch(url.replace('shared.txt', 'other.txt'))
  assert.equal(bad.status, 401)
  const form = new FormData()
  form.append('file', new Blob(['via signed url']), 'uploaded.txt')
  const up = await fetch(await sbx.uploadUrl('uploaded.txt'), { method: 'POST', body: form })
  assert.equal(up.status, 200, await up.text())
  assert.equal(await sbx.files.read('uploaded.txt'), 'via signed url')
})

test('gzip upload and a binary round trip', async () => {
  const data = new Uint8Array(3 * 1024 * 1024).map((_, i) => i % 251)
  await sbx.files.write('bin.dat', data.buffer, { gzip: true })
  const back = await sbx.files.read('bin.dat', { format: 'bytes' })
  assert.equal(back.length, data.length)
  assert.deepEqual(back.subarray(0, 1000), data.subarray(0, 1000))
  assert.deepEqual(back.subarray(-1000), data.subarray(-1000))
})
