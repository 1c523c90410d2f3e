<?php
// Exercises the extensions of a layer that need bundled libraries or data
// files. Prints "ok <check>" per passing check; the first failing check
// throws, which makes PHP exit non-zero.

declare(strict_types=1);

function check(string $name, bool $condition, string $detail = ''): void
{
    if (!$condition) {
        throw new RuntimeException("check $name failed" . ($detail === '' ? '' : ": $detail"));
    }
    echo "ok $name\n";
}

$tmp = sys_get_temp_dir() . '/extensions-' . getmypid();
mkdir($tmp);

// curl with OpenSSL: a TLS server in a child process on loopback, a
// certificate made here, verified by curl against that certificate.
$version = curl_version();
check('curl-uses-openssl', str_starts_with($version['ssl_version'], 'OpenSSL/'), $version['ssl_version']);
check('curl-has-http2', ($version['features'] & CURL_VERSION_HTTP2) !== 0);
$cafile = ini_get('curl.cainfo');
check('ca-bundle-present', is_file($cafile) && substr_count(file_get_contents($cafile), 'BEGIN CERTIFICATE') > 100, (string) $cafile);

$config = "$tmp/openssl.cnf";
file_put_contents($config, "[req]\ndistinguished_name = dn\n[dn]\n[san]\nsubjectAltName = IP:127.0.0.1\n");
$options = ['config' => $config, 'digest_alg' => 'sha256', 'x509_extensions' => 'san'];
$key = openssl_pkey_new(['private_key_type' => OPENSSL_KEYTYPE_EC, 'curve_name' => 'prime256v1']);
$csr = openssl_csr_new(['commonName' => '127.0.0.1'], $key, $options);
$certificate = openssl_csr_sign($csr, null, $key, 1, $options);
openssl_x509_export_to_file($certificate, "$tmp/cert.pem");
openssl_pkey_export_to_file($key, "$tmp/key.pem", null, ['config' => $config]);

$context = stream_context_create(['ssl' => ['local_cert' => "$tmp/cert.pem", 'local_pk' => "$tmp/key.pem"]]);
$server = stream_socket_server('tls://127.0.0.1:0', $errno, $errstr, STREAM_SERVER_BIND | STREAM_SERVER_LISTEN, $context);
check('tls-server-listens', $server !== false, "$errno $errstr");
$port = (int) substr(strrchr(stream_socket_get_name($server, false), ':'), 1);
$child = pcntl_fork();
if ($child === 0) {
    $connection = stream_socket_accept($server, 10);
    if ($connection !== false) {
        fread($connection, 4096);
        fwrite($connection, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
        fclose($connection);
    }
    exit(0);
}
$curl = curl_init("https://127.0.0.1:$port/");
curl_setopt_array($curl, [CURLOPT_RETURNTRANSFER => true, CURLOPT_CAINFO => "$tmp/cert.pem", CURLOPT_TIMEOUT => 10]);
$body = curl_exec($curl);
check('curl-https-verified', $body === 'hello', curl_error($curl));
pcntl_waitpid($child, $status);

// intl, with ICU's data library.
$formatter = new NumberFormatter('de_DE', NumberFormatter::DECIMAL);
check('intl-number-format', $formatter->format(1234567.891) === '1.234.567,891', (string) $formatter->format(1234567.891));
$collator = new Collator('sv_SE');
$words = ['ö', 'z', 'a'];
$collator->sort($words);
check('intl-collation', $words === ['a', 'z', 'ö'], implode(',', $words));
check('intl-transliteration', transliterator_transliterate('Any-Latin; Latin-ASCII', 'Ελληνικά') === 'Ellenika');

// sodium.
$keypair = sodium_crypto_box_keypair();
$sealed = sodium_crypto_box_seal('secret', sodium_crypto_box_publickey($keypair));
check('sodium-sealed-box', sodium_crypto_box_seal_open($sealed, $keypair) === 'secret');

// mbstring, with oniguruma for the regular expressions.
check('mbstring-case', mb_strtoupper('éàü') === 'ÉÀÜ');
check('mbstring-regex', mb_ereg_replace('[[:space:]]+', '-', "a b\u{3000}c") === 'a-b-c');

// PDO SQLite.
$pdo = new PDO('sqlite::memory:');
$pdo->exec('CREATE TABLE t (name TEXT)');
$pdo->prepare('INSERT INTO t VALUES (?)')->execute(['layer']);
check('pdo-sqlite', $pdo->query('SELECT name FROM t')->fetchColumn() === 'layer');

// zip.
$archive = new ZipArchive();
check('zip-create', $archive->open("$tmp/test.zip", ZipArchive::CREATE) === true);
$archive->addFromString('hello.txt', str_repeat('hello ', 1000));
$archive->close();
$archive->open("$tmp/test.zip");
check('zip-read', $archive->getFromName('hello.txt') === str_repeat('hello ', 1000));
$archive->close();

// SimpleXML.
$xml = simplexml_load_string('<layers><layer name="php-82"/><layer name="php-82-fpm"/></layers>');
check('simplexml-xpath', (string) $xml->xpath('//layer[2]')[0]['name'] === 'php-82-fpm');

// opcache, enabled for the CLI by the layer's ini.
$status = opcache_get_status(false);
check('opcache-enabled', is_array($status) && $status['opcache_enabled'] === true);

// iconv through glibc's gconv modules.
check('iconv-translit', iconv('UTF-8', 'ASCII//TRANSLIT', 'Žluťoučký kůň') === 'Zlutoucky kun');
check('iconv-gconv-module', iconv('UTF-8', 'ISO-8859-2', 'ř') === "\xF8");

echo "all checks passed\n";
